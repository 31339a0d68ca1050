"""nbtune.train"""
