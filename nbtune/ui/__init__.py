"""nbtune.ui"""
