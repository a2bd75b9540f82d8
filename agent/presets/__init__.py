"""Packaged presets: configs the image can boot with, and their appliance logic."""
