"""``python -m featx`` (what ``torchrun ... -m featx extract`` runs)."""

from featx.cli import main

if __name__ == "__main__":
    main()
