"""What every command shares: one-line errors, command lines, stop signals, atomic files, and the Config of a run."""
