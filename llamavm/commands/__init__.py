"""The Invoke task bodies that tasks.py assembles: a module per namespace, the root's by theme.

Each parses its flags, calls the library and prints; the views (models, status, switch lines)
sit beside them. Modules only some tasks need are imported inside those tasks.
"""
