"""The async stream (pipelined backpropagation): its executor, the calls that feed and flush it, each stage's
weight versions and the delay corrections."""
