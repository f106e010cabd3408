"""The resource monitor: what the hardware does while a model trains, and what training does about it.

sampler.py  a background thread that samples NVML (GPU memory, utilisation, power, temperature, SM
            clock, throttle reasons, energy) and psutil (process RSS and CPU, host RAM) into
            monitor.csv and keeps the latest reading for the training loop
policy.py   pure decisions from readings: shrink the micro-batch before an out-of-memory error,
            checkpoint now when temperature, throttling or memory says a stop may be coming
power.py    an optional GPU power limit, applied, read back and always restored
hostmem.py  host memory as the training process may use it: the tighter of the machine's RAM and its
            cgroup's limit
"""
