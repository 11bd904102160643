"""Lab and test tooling: a throw-away CA, the demo, generated disk images, a fake control plane."""
