"""Evaluation tasks. ``needle`` is the needle-in-a-haystack task (methods.md, "Evaluation harness")."""
