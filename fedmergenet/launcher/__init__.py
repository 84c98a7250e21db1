"""The launcher: starts Flower (SuperLink, SuperNodes, `flwr run`) and runs the experiments; what runs
inside Flower is the app in fedmergenet.flower."""
