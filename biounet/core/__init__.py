"""The bottom layer: files written atomically, command-line types, watched worker processes, logs,
pictures and curves. Imports nothing of ours."""
