"""The typed records the stages hand each other (written by one stage, read by the next)."""
