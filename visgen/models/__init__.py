"""visgen.models"""
