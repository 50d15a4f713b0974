"""Thin stage entry points: load params -> build -> run -> save -> write metrics."""
