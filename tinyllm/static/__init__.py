"""The chat page served at `/` by tinyllm.serve (plain HTML + JS, no build step)."""
