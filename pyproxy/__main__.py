from pyproxy.cli import main_exit

main_exit()
