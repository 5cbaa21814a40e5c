"""Running one replica across several processes: tensor-parallel groups and their collectives (parallel.py)."""
