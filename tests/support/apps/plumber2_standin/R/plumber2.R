# A stand-in for plumber2's api() and api_run(), for corral's tests only.
#
# api() takes what plumber2's does (a _server.yml, a directory, or route files) and reads
# `#* @get PATH` / `#* @post PATH` annotations; api_run() serves them with httpuv, blocking.
# Handlers get `request` (httpuv's environment, so request$HTTP_TRACEPARENT works) and answer a
# list, sent as JSON. Each call says on stdout how it was called, so a test can read the launch.

api <- function(..., doc_type = "rapidoc", env = parent.frame()) {
  args <- c(...)
  cat("plumber2 stand-in: api(", paste(shQuote(args), collapse = ", "), ")\n", sep = "")
  files <- unlist(lapply(args, route_files))
  routes <- list()
  for (f in files) routes <- c(routes, parse_routes(f, env))
  structure(list(routes = routes, docs = !is.null(doc_type)), class = "Plumber2")
}

api_run <- function(api, host = NULL, port = NULL, ...) {
  host <- if (is.null(host)) "127.0.0.1" else host
  port <- if (is.null(port)) 8080L else as.integer(port)
  cat("plumber2 stand-in: api_run(host = ", host, ", port = ", port, ")\n", sep = "")
  httpuv::runServer(host, port, list(call = function(req) serve(api, req)))
}

route_files <- function(path) {
  if (dir.exists(path)) {
    yml <- file.path(path, "_server.yml")
    if (file.exists(yml)) return(route_files(yml))
    return(list.files(path, pattern = "[.][Rr]$", full.names = TRUE))
  }
  if (grepl("^_server[.]ya?ml$", basename(path))) {
    lines <- readLines(path)
    engine <- sub("^engine:[[:space:]]*", "", grep("^engine:", lines, value = TRUE))
    if (!identical(engine, "plumber2")) stop("_server.yml: engine is not plumber2")
    # a YAML list under `routes:`, one `- file` per line: all the stand-in needs to read
    start <- grep("^routes:", lines)
    items <- lines[seq_along(lines) > start & grepl("^[[:space:]]*- ", lines)]
    return(file.path(dirname(path), trimws(sub("^[[:space:]]*- ", "", items))))
  }
  path
}

parse_routes <- function(file, env) {
  exprs <- parse(file, keep.source = TRUE)
  src <- readLines(file)
  routes <- list()
  for (i in seq_along(exprs)) {
    first <- attr(exprs, "srcref")[[i]][1]
    above <- src[seq_len(first - 1)]
    tags <- regmatches(above, regexec("^#[*'][[:space:]]*@(get|post)[[:space:]]+(\\S+)", above))
    tags <- Filter(length, tags)
    value <- eval(exprs[[i]], env)
    if (length(tags) && is.function(value)) {
      tag <- tags[[length(tags)]]
      routes[[length(routes) + 1]] <- list(method = toupper(tag[2]), path = tag[3], fn = value)
    }
    src[seq_len(first - 1)] <- ""  # an annotation belongs to the first expression after it only
  }
  routes
}

serve <- function(api, req) {
  for (r in api$routes) {
    if (r$method == req$REQUEST_METHOD && r$path == req$PATH_INFO) {
      body <- jsonlite::toJSON(r$fn(request = req), auto_unbox = TRUE)
      return(list(status = 200L, headers = list("Content-Type" = "application/json"), body = as.character(body)))
    }
  }
  list(status = 404L, headers = list("Content-Type" = "application/json"), body = '{"error": "not found"}')
}
