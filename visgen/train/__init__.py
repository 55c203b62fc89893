"""visgen.train"""
