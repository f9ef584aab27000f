# Bench app for bench/compare: tiny, deterministic endpoints so that the proxy,
# not the app, is what differs between runs.

#* Tiny JSON, as cheap as plumber gets.
#* @get /fast
#* @serializer unboxedJSON
function() {
  list(ok = TRUE)
}

#* Sleep (not CPU) for ms milliseconds: models an I/O-bound slow request.
#* @get /sleep
#* @serializer unboxedJSON
function(ms = "0") {
  ms <- as.numeric(ms)
  Sys.sleep(ms / 1000)
  list(ok = TRUE, ms = ms)
}

#* Busy-loop for ms milliseconds of CPU: models a CPU-bound slow request.
#* @get /work
#* @serializer unboxedJSON
function(ms = "0") {
  ms <- as.numeric(ms)
  deadline <- proc.time()[["elapsed"]] + ms / 1000
  n <- 0
  while (proc.time()[["elapsed"]] < deadline) n <- n + 1
  list(ok = TRUE, ms = ms, spins = n)
}
