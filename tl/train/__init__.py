"""A run built from its Config (setup), trained epoch by epoch (loop) and ended (finish): optimizer, loss
targets, EMA."""
