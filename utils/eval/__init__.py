"""utils/eval"""
