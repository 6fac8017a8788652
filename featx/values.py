"""Option values read from text and checked: shard specs, sizes, failure limits, ranges and
choices. No torch: the CLI checks values before anything heavy is imported."""

from __future__ import annotations

from featx.errors import UsageError


def parse_shard(text: str) -> tuple[int, int]:
    """'3/16' → (3, 16)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, e.g. 3/16") from None
    if not (n >= 1 and 0 <= k < n):
        raise UsageError(f"--shard {text!r}: expected K/N with 0 <= K < N")
    return k, n


def check_range(name: str, value: int | None, low: int, high: int) -> None:
    """UsageError unless ``value`` (when given) lies in ``[low, high]``."""
    flag = "--" + name.replace("_", "-")
    if value is not None and value < low:
        raise UsageError(f"{flag} must be at least {low}")
    if value is not None and value > high:
        raise UsageError(f"{flag} must be at most {high}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"--{name} {value!r}: expected one of {', '.join(choices)}")


def parse_max_failures(spec: int | str) -> tuple[int | None, float | None]:
    """'10' → (10, None); '5%' → (None, 0.05); 'none' → no limit."""
    text = str(spec).strip()
    if text.lower() in ("none", "inf", ""):
        return None, None
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
            if not 0 <= fraction <= 1:
                raise ValueError
            return None, fraction
        count = int(text)
        if count < 0:
            raise ValueError
        return count, None
    except ValueError:
        raise UsageError(
            f"--max-failures {spec!r}: expected a count (10), a percentage (5%) or 'none'"
        ) from None


def too_many_failures(spec: int | str, failed: int, total: int) -> bool:
    count, fraction = parse_max_failures(spec)
    if count is not None:
        return failed > count
    if fraction is not None:
        return total > 0 and failed / total > fraction
    return False


_BYTE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(spec: str | int, option: str = "--memory-budget") -> int:
    """'2GB' → 2147483648; '512MB', '64K', '1.5G' or a plain count of bytes (powers of 1024)."""
    text = str(spec).strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (text[:-1], text[-1]) if text[-1:] in _BYTE_UNITS and text[-1:] else (text, "")
    try:
        value = int(float(number) * _BYTE_UNITS[unit])
    except (ValueError, OverflowError):  # 'x', 'inf'
        value = 0
    if value < 1:
        raise UsageError(f"{option} {spec!r}: expected a size such as 512MB or 2GB")
    return value
