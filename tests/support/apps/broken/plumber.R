#* @get /x
function() {
  list(ok = TRUE
}
