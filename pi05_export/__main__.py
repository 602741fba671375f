from pi05_export.cli import main

main()
