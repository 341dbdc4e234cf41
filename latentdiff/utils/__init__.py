"""Layer 0, used by every stage: process groups and collectives (``dist``), atomic writes and hashing
(``io``), seed lists (``seeds``), the error types (``errors``)."""
