# An example plumber API for corral. Run it with:  corral run -w 4 examples/plumber/plumber.R

#* Health check
#* @get /health
function() {
  list(status = "ok")
}

#* Echo a message back
#* @param msg The message to echo
#* @get /echo
function(msg = "") {
  list(msg = paste0("The message is: '", msg, "'"))
}

#* Which worker answered (its index and process id)
#* @get /whoami
function() {
  list(index = Sys.getenv("CORRAL_WORKER_INDEX"), pid = Sys.getpid(), port = Sys.getenv("PORT"))
}

#* A slow endpoint: blocks this R process for `s` seconds
#* @param s seconds to sleep
#* @get /slow
function(s = 2) {
  Sys.sleep(as.numeric(s))
  list(slept = as.numeric(s), pid = Sys.getpid())
}

#* Sum two numbers
#* @param a:number
#* @param b:number
#* @post /sum
function(a, b) {
  list(sum = as.numeric(a) + as.numeric(b))
}

#* Return the length of the posted body
#* @post /upload
function(req) {
  list(bytes = length(req$bodyRaw))
}
