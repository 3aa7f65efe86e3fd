"""utils/train"""
