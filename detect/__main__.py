from detect.cli import main

main()
