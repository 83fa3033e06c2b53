"""GuardedTuning tests."""
