"""nbtune.assets"""
