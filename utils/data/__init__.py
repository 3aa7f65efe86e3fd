"""utils/data"""
