"""Where and how a run executes: device and precision, torchrun/--shard coordination
(distributed.Job), signals, the progress bar and the background writer thread."""
