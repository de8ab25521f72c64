"""Client side: local training, private state, budget guard and on-device serving."""
