"""visgen.data"""
