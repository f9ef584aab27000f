# A small Shiny app for corral: `corral run -w 4 examples/shiny` (no options: the directory holds an
# app.R calling shinyApp(), so corral starts each worker with shiny::runApp and sticky cookies on).
#
# Each browser session lives in one R process: `out` is computed by that process's server function,
# and `who` says which process and which corral worker (CORRAL_WORKER_INDEX) it is.
library(shiny)

ui <- fluidPage(
  titlePanel("corral + Shiny"),
  numericInput("n", "n", value = 3),
  textOutput("out"),
  textOutput("who")
)

server <- function(input, output, session) {
  # When corral retires this worker (reload, recycling, scale-down) it closes the session once
  # graceful_timeout has passed; "force" makes the browser reconnect by itself, to a live worker, and
  # send its inputs again. Only for apps whose server-side state is rebuilt from their inputs, like
  # this one: anything else the old R process held is gone (see docs/shiny.md).
  session$allowReconnect("force")
  output$out <- renderText({
    req(input$n)
    paste("n squared is", input$n^2)
  })
  output$who <- renderText({
    paste0("pid ", Sys.getpid(), ", worker ", Sys.getenv("CORRAL_WORKER_INDEX", "?"))
  })
}

shinyApp(ui, server)
