"""What every other package stands on; imports nothing of steerserve's own."""
