"""nbtune.models"""
