"""The Flower app (ServerApp, ClientApp, strategy) and the runtimes that run it."""
