"""DINOv2 backbones, heads, weight loading and export."""
