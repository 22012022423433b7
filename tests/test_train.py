"""The training core: mesh equivalence, sharded memory, accumulation, resume, CLI errors."""
