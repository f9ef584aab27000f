# A Shiny app for corral's tests (tests/test_shiny.py): a download and an upload that say which R process
# and which Shiny session answered them, so a test can tell where each request of a session went.
# Shiny names the session in their paths (session/<id>/download/..., session/<id>/upload/...).
library(shiny)

ui <- fluidPage(
  titlePanel("corral files"),
  fileInput("up", "Upload"),
  textOutput("got"),
  downloadLink("down", "Download"),
  textOutput("who")
)

server <- function(input, output, session) {
  # A session whose worker is retired reconnects by itself to a live one (see examples/shiny/app.R).
  session$allowReconnect("force")
  me <- function() paste0("pid ", Sys.getpid(), ", worker ", Sys.getenv("CORRAL_WORKER_INDEX", "?"))
  output$who <- renderText(me())
  output$got <- renderText({
    req(input$up)
    first <- readLines(input$up$datapath, n = 1, warn = FALSE)
    paste0("got ", input$up$name, " (", first, ") in session ", session$token, ", ", me())
  })
  output$down <- downloadHandler(
    filename = "who.txt",
    content = function(file) writeLines(paste0("session ", session$token, ", ", me()), file)
  )
}

shinyApp(ui, server)
