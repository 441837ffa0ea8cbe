from catdogcnn.cli import app

app()
