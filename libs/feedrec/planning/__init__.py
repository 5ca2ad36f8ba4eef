"""Planning: capacity for a target scale, from the measured benchmarks and stated assumptions."""
