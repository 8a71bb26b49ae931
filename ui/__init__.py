"""Gradio web UI: presentation only, over the functions in studio/."""
