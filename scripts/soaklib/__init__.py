"""The soak (scripts/soak): a private system of RabbitMQ, Mosquitto and workers under a steady
load and random faults, recorded into a run directory for scripts/soak_check.py."""
