"""nbtune.planner"""
