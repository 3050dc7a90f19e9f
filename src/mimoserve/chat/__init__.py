"""The chat service: validated request -> prompt -> backend -> events -> response or chunks."""
