"""A trained model used: rebuilt from its checkpoint, its predictions written, exported models read, the errors
report."""
