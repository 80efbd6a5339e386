"""The catalog as a Docker Compose project (issue 25): the inventory's Compose settings (site),
the project folder `invoke compose.render` writes (render), the container engine's client
(engine), and the switch, stop and status transaction on containers (switch). Callers import
the module that owns each name; this package re-exports nothing."""
