"""visgen.eval"""
