"""Many replicas: engine cores as Ray actors (replica.py), the client that spreads requests over them
(client.py), and the router with its policies (router.py, routers/)."""
