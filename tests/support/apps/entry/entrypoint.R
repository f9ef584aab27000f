# entrypoint.R returns a router built with plumber's functions, unqualified: plumber must be attached.
pr() %>%
  pr_get("/cwd", function() list(cwd = basename(getwd()))) %>%
  pr_get("/ping", function() "pong")
