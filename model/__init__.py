"""tinygpt: a minimal, trainable GPT. The library behind train.py and sample.py."""
