"""Models, losses, data and the training engine of dinoflow."""
